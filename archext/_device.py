"""The ``--device`` flag of the ``archext`` commands (``ablate``, ``profile``)."""
import archext


def resolve_device(name: str) -> str:
    """``auto`` is ``cuda`` when archext's CUDA kernels and a GPU are both there, else ``cpu``; a
    CUDA device that archext cannot use exits with the reason."""
    if name == "auto":
        return "cuda" if archext.cuda_available() else "cpu"
    if name.startswith("cuda") and not archext.cuda_available():
        raise SystemExit(f"--device {name}: archext's CUDA kernels or a GPU are not available "
                         f"({archext.build_info()})")
    return name
