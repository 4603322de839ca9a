"""gem3d.export"""
