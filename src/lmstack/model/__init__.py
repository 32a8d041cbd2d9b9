"""lmstack.model"""
