"""pikaserve.model"""
