"""Shared test setup: one intra-op thread keeps the suite steady on a shared 2-core machine."""
from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # tests/zoo.py
