"""QARM: behaviour alignment of item features, RQ-Kmeans and VQ codes."""
