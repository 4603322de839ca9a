"""gem3d.metrics: synthetic volumes measured against real ones (image quality, 3D consistency, label fidelity,
distribution, references); ``report`` writes metrics.csv, summary.md, plots and report.html."""
