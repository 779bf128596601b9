"""pikaserve.kv"""
