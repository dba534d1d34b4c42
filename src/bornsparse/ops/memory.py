"""Re-exports, under this module's import path, the huge-page advice for the buffers the
wide-layer kernels touch at random, whose code lives in ``ops/runtime/memory.py``."""

from bornsparse.ops.runtime.memory import HUGE_PAGE, advise_huge_pages, huge_page_copy

__all__ = ["HUGE_PAGE", "advise_huge_pages", "huge_page_copy"]
