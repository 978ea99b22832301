"""Checkpoint tools: conversion between moetx, T5X and Hugging Face formats.

Submodules are imported explicitly (`from moetx.convert import hf`), so importing this package stays
cheap and does not pull in `transformers`.
"""
