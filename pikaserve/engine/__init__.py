"""pikaserve.engine"""
