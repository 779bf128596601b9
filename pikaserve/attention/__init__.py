"""pikaserve.attention"""
