"""lmstack.tokenizer"""
