"""Launcher options that need a Hydra plugin: say how to install it instead of Hydra's config-search error."""
from __future__ import annotations

import importlib.util
import sys

# hydra/launcher=OPTION -> (the plugin's module, its pip package)
PLUGIN_LAUNCHERS = {
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def _installed(module: str) -> bool:
    try:  # hydra_plugins is a namespace package that exists only once some plugin is installed
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def missing_plugin(argv: list[str]) -> str | None:
    """The message for a ``hydra/launcher=...`` override whose plugin is not installed, else None."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "hydra/launcher" and value in PLUGIN_LAUNCHERS:
            module, package = PLUGIN_LAUNCHERS[value]
            if not _installed(module):
                return (f"hydra/launcher={value} needs the {package} plugin, which is not installed: "
                        f"pip install {package} (or pip install -e \".[slurm]\"), then run the same command again")
    return None


def check_launcher(argv: list[str]) -> None:
    message = missing_plugin(argv)
    if message:
        print(f"configuration error: {message}", file=sys.stderr)
        sys.exit(2)
