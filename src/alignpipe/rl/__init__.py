"""alignpipe.rl"""
