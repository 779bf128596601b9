"""pikaserve.server"""
