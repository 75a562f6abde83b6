"""dejavu_py.comm"""
