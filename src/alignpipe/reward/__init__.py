"""alignpipe.reward"""
