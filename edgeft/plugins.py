"""The plugin manager: loads device plugins from the `edgeft` entry-point group."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import pluggy

from . import hookspecs
from .errors import ProfileError, did_you_mean
from .targets import Profile, Registry, Target, read_profile

REPO_DEVICES = Path(__file__).resolve().parent.parent / "devices"


def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("edgeft")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints("edgeft")
    pm.check_pending()  # a misspelled hook name in a plugin is an error, not silence
    return pm


@functools.cache
def registry() -> Registry:
    pm = get_plugin_manager()
    reg = Registry()
    for impl in pm.hook.register_targets.get_hookimpls():
        plugin = pm.get_name(impl.plugin) or impl.plugin_name

        def register(target: Target, _plugin=plugin):
            if target.name in reg.targets:
                other = reg.targets[target.name].plugin
                raise ProfileError(f"plugin {_plugin}: target {target.name!r} is already registered by {other}.")
            reg.targets[target.name] = dataclasses.replace(target, plugin=_plugin)

        impl.function(register=register)
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


def all_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in registry().profile_dirs:
        for f in sorted(d.glob("*.toml")):
            found.setdefault(f.stem, f)
    return found


def find_profile(device: str) -> tuple[Profile, Target]:
    """`--device NAME` (a profile in a devices folder) or `--device PATH/TO/FILE.toml`."""
    p = Path(device)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ProfileError(f"{p}: no such device profile file.")
        profile = read_profile(p)
    else:
        profiles = all_profiles()
        if device not in profiles:
            raise ProfileError(f"--device: no profile named {device!r}; known profiles: {', '.join(profiles)}."
                               f"{did_you_mean(device, profiles)} Or pass a path to your own .toml.")
        profile = read_profile(profiles[device])
    try:
        target = get_target(profile.target)
    except ProfileError as e:
        raise ProfileError(f"{profile.path}: target: {e}") from None
    return profile, target
