"""dejavu_py.runtime"""
