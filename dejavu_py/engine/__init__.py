"""dejavu_py.engine"""
