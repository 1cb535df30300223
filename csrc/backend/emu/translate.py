"""The emulated GPU's view of a CUDA source: ``k<<<grid, block, shmem, stream>>>(args)`` becomes
``::emu::launch("k", k, ::emu::Config(grid, block, shmem, stream), args)`` and ``dlopen``/``dlsym``
become the emulator's, so that csrc/backend/cuda_backend.cu compiles as C++ against the headers of
csrc/backend/emu/include (see cuda_runtime.h there). Lines keep their numbers; compiler messages point
at the original file.

    python translate.py IN.cu OUT.cpp
"""

import re
import sys

LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<(?P<config>.*?)>>>\(", re.S)


def translate(src: str, path: str) -> str:
    def launch(m):
        k = m.group("kernel")
        return f'::emu::launch("{k}", {k}, ::emu::Config({m.group("config")}), '

    out, launches = LAUNCH.subn(launch, src)
    if launches == 0 or "<<<" in out or ">>>" in out:
        raise SystemExit(f"{path}: found {launches} kernel launches and some <<< >>> left that this script cannot read")
    out, opened = re.subn(r"\bdlopen\(", "::emu::dl_open(", out)
    out, found = re.subn(r"\bdlsym\(", "::emu::dl_sym(", out)
    if not opened or not found:
        raise SystemExit(f"{path}: no dlopen/dlsym to redirect: the emulator would not supply cuBLAS/cuSOLVER")
    return f'#line 1 "{path}"\n' + out


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, encoding="utf-8") as f:
        text = translate(f.read(), src)
    with open(dst, "w", encoding="utf-8") as f:
        f.write(text)
