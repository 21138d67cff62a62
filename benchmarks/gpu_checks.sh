#!/usr/bin/env bash
# The checks that need a CUDA device: the gpu-marked tests and the model benchmark on the GPU.
# Run from the repository root on a machine with a GPU and the dependencies installed.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python3 -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py -q
python3 benchmarks/bench_model.py --device cuda --dtype bfloat16 --repeats 10 --realistic_samples 512
python3 benchmarks/bench_model.py --device cuda --dtype float32 --repeats 10 --realistic_samples 128
# MFU of the ImageBERT-base bf16 pretraining step at batch 256, every attention backend that runs, eager and compiled.
python3 benchmarks/gpu_mfu.py --batch_size 256
