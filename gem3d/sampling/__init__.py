"""gem3d.sampling"""
