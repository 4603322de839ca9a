"""gem3d.metrics"""
