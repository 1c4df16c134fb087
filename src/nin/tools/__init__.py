"""The commands around the library: `predict` (files in, a listing or a table out), `visualize` (Figure 4's
confidence maps, curves), `reproduce` (the paper's tables, RESULTS.md), `bench` (throughput against a plain
port), `caffe` (the authors' Caffe weights)."""
