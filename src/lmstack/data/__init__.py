"""lmstack.data"""
