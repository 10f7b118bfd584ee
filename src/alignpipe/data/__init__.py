"""alignpipe.data"""
