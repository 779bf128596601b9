"""pikaserve.bench"""
