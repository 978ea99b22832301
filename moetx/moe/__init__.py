"""Sparse mixture-of-experts: routers, MoE layers and sparse architectures."""
