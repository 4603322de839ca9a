"""gem3d.models"""
