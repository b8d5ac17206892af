"""fastft: lean, high-throughput LoRA fine-tuning for GPT-OSS."""

__version__ = "0.1.0"


def _mount_source_kernels() -> None:
    """Running from a source checkout without `pip install`: serve the top-level kernels/ folder as fastft.kernels.

    An install maps it there already (setup.py package_dir); it is never importable as a bare `kernels`, the name of
    the Hugging Face kernel hub package that transformers probes for.
    """
    import importlib.util
    import sys
    from pathlib import Path

    if "fastft.kernels" in sys.modules:
        return
    try:
        if importlib.util.find_spec("fastft.kernels") is not None:
            return
    except ImportError:
        pass
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("fastft.kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastft.kernels"] = module
    spec.loader.exec_module(module)


_mount_source_kernels()
