"""gem3d.inference"""
