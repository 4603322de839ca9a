"""gem3d.convert"""
