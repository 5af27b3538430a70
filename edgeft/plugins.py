"""The plugin manager: the built-in plugins, registered in code, and third-party plugins from the
`edgeft` entry-point group; the registry of targets, runtime engines and profile folders they make.

Built-ins are default plugins (as llm registers its own): a source checkout that pip never
installed still has its targets and engines. Shared by both sides: the device asks it for the
engine a bundle names, so it imports nothing beyond the plugin contract.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import os
import sys
from pathlib import Path

import pluggy

from . import hookspecs
from .errors import ProfileError, did_you_mean
from .targets import Registry, Target

ROOT = Path(__file__).resolve().parent.parent
REPO_DEVICES = ROOT / "devices"
BUILTIN_DIR = ROOT / "plugins"  # the built-in plugin packages, beside edgeft/ in a checkout
# name -> module; the names are those the built-ins had as entry points, so an older install's
# entry points name the same plugins and are skipped
DEFAULT_PLUGINS = {
    "onnxruntime": "edgeft.runtime.engines",
    "cpu": "edgeft_cpu",
    "jetson": "edgeft_jetson",
    "mobile": "edgeft_mobile",
    "openvino": "edgeft_openvino",
}


def import_builtin(module: str):
    """A built-in plugin module; in a source checkout pip did not install, from plugins/."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name != top or not (BUILTIN_DIR / top / "__init__.py").is_file():
            raise
    sys.path.append(str(BUILTIN_DIR))  # what an install puts on the path for them
    return importlib.import_module(module)


def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("edgeft")
    pm.add_hookspecs(hookspecs)
    for name, module in DEFAULT_PLUGINS.items():
        pm.register(import_builtin(module), name=name)
    for ep in importlib.metadata.entry_points(group="edgeft"):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        plugin = ep.load()
        if not pm.is_registered(plugin):  # a built-in installed under another entry-point name
            pm.register(plugin, name=ep.name)
    pm.check_pending()  # a misspelled hook name in a plugin is an error, not silence
    return pm


def _collect(pm: pluggy.PluginManager, hook, store: dict, what: str) -> None:
    """Call `hook(register=...)` plugin by plugin, so each registered item records its plugin."""
    for impl in hook.get_hookimpls():
        plugin = pm.get_name(impl.plugin) or impl.plugin_name

        def register(item, _plugin=plugin):
            if item.name in store:
                other = store[item.name].plugin
                raise ProfileError(f"plugin {_plugin}: {what} {item.name!r} is already registered by {other}.")
            store[item.name] = dataclasses.replace(item, plugin=_plugin)

        impl.function(register=register)


@functools.cache
def registry() -> Registry:
    pm = get_plugin_manager()
    reg = Registry()
    _collect(pm, pm.hook.register_targets, reg.targets, "target")
    _collect(pm, pm.hook.register_engines, reg.engines, "engine")
    for t in reg.targets.values():
        if t.engine not in reg.engines:
            raise ProfileError(f"plugin {t.plugin}: target {t.name}: engine {t.engine!r} is not registered by any "
                               f"plugin ({', '.join(sorted(reg.engines))}).")
    dirs: list[Path] = []
    pm.hook.register_device_profiles(register=lambda p: dirs.append(Path(p)))
    extra = [Path(p) for p in os.environ.get("EDGEFT_DEVICES", "").split(os.pathsep) if p]
    for d in [*extra, Path.cwd() / "devices", REPO_DEVICES, *dirs]:
        if d.is_dir() and d.resolve() not in [x.resolve() for x in reg.profile_dirs]:
            reg.profile_dirs.append(d)
    return reg


def get_target(name: str) -> Target:
    targets = registry().targets
    if name not in targets:
        raise ProfileError(f"unknown target {name!r}; installed targets: {', '.join(sorted(targets)) or 'none'}."
                           f"{did_you_mean(name, targets)}")
    return targets[name]
