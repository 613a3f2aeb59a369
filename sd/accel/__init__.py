"""What trades clarity for speed: compiled forwards, CPU and CUDA kernels, precision choices."""
