"""dejavu_py.ft"""
