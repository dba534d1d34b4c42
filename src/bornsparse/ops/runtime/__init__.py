"""What every kernel of ``bornsparse.ops`` shares, whatever its op family.

* ``region``: a parallel region's int64 header (``header_layout``, ``pack_header``) and its
  launch on torch's own OpenMP team (``launch``; a Python thread pool or the calling thread
  where there is none).
* ``bodies``: region bodies and their chunk loop (``region_body``, ``claim_chunk``,
  ``finish_chunk``, ``chunk_plan``, ``NoAliasCompiler``).
* ``intrinsics``: LLVM intrinsics and pointer helpers for the bodies (``prefetch``,
  ``as_voidptr``, ``atomic_increment``, ``view``).
* ``hardware``: cache sizes from sysfs and torch's thread count, read at run time.
* ``memory``: huge-page advice for the buffers the wide kernels touch at random.
* ``workspace``: scratch kept per thread across calls (fresh per-call scratch page-faults).
* ``transpose``: the 8×8-blocked transposes between (batch, features) rows and
  (features, batch) columns that the permuted and DCT kernels share.
* ``validated``: index checks run once per tensor version (``check_once``).
* ``autograd``: ``no_double_backward``, the formula every kernel's backward op registers.
* ``triton_support``: dtype helpers and the tensor check every Triton kernel uses.
* ``mkl_warmup``: MKL VML's dispatch settled on one thread when ``bornsparse.ops`` is
  imported.

Nothing is imported here: ``import bornsparse.ops`` loads ``mkl_warmup`` alone (torch only),
and numba and triton load with the first kernel that needs them.
"""
