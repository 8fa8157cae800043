"""The vLLM plugin's settings and per-request field (no vLLM needed; the plugin itself is
tested in tests_vllm/ against a real engine)."""

import json
import subprocess
import sys

import pytest

from headgain import ArchMap, ConfigError, HeadGainConfig, presets
from headgain.vllm import ENV_ARCH_MAP, ENV_CONFIG, ENV_ENABLE, ENV_KEYS, ENV_RECORD, PluginSettings, request_config


def test_unset_environment_leaves_the_plugin_off():
    assert PluginSettings.from_env({}) == PluginSettings()
    assert PluginSettings.from_env({ENV_ENABLE: "0"}).enabled is False


def test_environment_gives_default_config_arch_map_and_recording(tmp_path):
    path = tmp_path / "cfg.json"
    HeadGainConfig(l_perc=2, g_perc=1.3).to_json(str(path))
    arch = ArchMap("model.layers.*.self_attn", visual_token_ids=(7,))
    got = PluginSettings.from_env({ENV_CONFIG: str(path), ENV_ARCH_MAP: arch.to_json(), ENV_RECORD: "5"})
    assert got == PluginSettings(True, HeadGainConfig(l_perc=2, g_perc=1.3), arch, 5)
    assert PluginSettings.from_env({ENV_CONFIG: "r1-onevision"}).default is presets["r1-onevision"]
    inline = PluginSettings.from_env({ENV_CONFIG: json.dumps({"g_reas": 1.2})})
    assert inline.default == HeadGainConfig(g_reas=1.2)
    assert PluginSettings.from_env({ENV_ENABLE: "1"}) == PluginSettings(enabled=True)
    assert PluginSettings.from_env({ENV_ENABLE: "1"}).keys == "auto"
    assert PluginSettings.from_env({ENV_ENABLE: "1", ENV_KEYS: "Copy"}).keys == "copy"


@pytest.mark.parametrize(
    "env, message",
    [
        ({ENV_ENABLE: "maybe"}, "HEADGAIN_VLLM='maybe'"),
        ({ENV_RECORD: "-1", ENV_ENABLE: "1"}, "HEADGAIN_RECORD='-1'"),
        ({ENV_CONFIG: '{"g_perc": 50}'}, "g_perc=50"),
        ({ENV_CONFIG: "no-such-preset"}, "cannot read config file 'no-such-preset'"),
        ({ENV_RECORD: "3"}, "needs enabled=True"),
        ({ENV_ENABLE: "1", ENV_KEYS: "paged"}, "HEADGAIN_KEYS='paged': use auto"),
    ],
)
def test_bad_environment_is_refused(env, message):
    with pytest.raises(ConfigError, match=message):
        PluginSettings.from_env(env)


def test_request_field():
    default = HeadGainConfig()
    assert request_config(None, default) is default
    assert request_config({"other": 1}, None) is None
    assert request_config({"headgain": False}, default) is None
    assert request_config({"headgain": None}, default) is None
    assert request_config({"headgain": "kimi-vl-a3b-thinking"}, None) is presets["kimi-vl-a3b-thinking"]
    assert request_config({"headgain": {"g_perc": 1.1}}, default) == HeadGainConfig(g_perc=1.1)
    assert request_config({"headgain": '{"g_perc": 1.1}'}, default) == HeadGainConfig(g_perc=1.1)  # vllm_xargs
    assert request_config({"headgain": "off"}, default) is None
    with pytest.raises(ConfigError, match="unknown preset '/etc/passwd'"):  # never a file path from a request
        request_config({"headgain": "/etc/passwd"}, None)
    with pytest.raises(ConfigError, match="takes a preset name"):
        request_config({"headgain": 3}, None)
    with pytest.raises(ConfigError, match="unknown HeadGainConfig field"):
        request_config({"headgain": {"gain": 2}}, None)


def test_importing_the_plugin_package_does_not_import_vllm():
    code = "import sys, headgain.vllm; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
