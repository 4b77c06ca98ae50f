"""A command that has imported TensorFlow still answers a user error with exactly one line."""

import os
import subprocess
import sys
import textwrap

import pytest

from tl_embed.tf_quiet import is_noise

TF_LINES = [  # what TensorFlow 2.21 printed on import on an AVX-512 CPU, and its CPU-feature notice
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796599340.524233    2079 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to "
    "use available CPU instructions in performance-critical operations.\n",
    "To enable the following instructions: AVX512F AVX512_VNNI AVX512_BF16, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.\n",
    "I0000 00:00:1796599340.9    2079 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results.\n",
    "W0000 00:00:1796599341.1    2080 some_file.cc:12] a warning\n",
]


def test_info_and_warning_records_are_noise_errors_and_other_lines_are_not():
    assert all(is_noise(line, 2) for line in TF_LINES)
    error = "E0000 00:00:1796599341.1    2080 kernel.cc:9] out of memory\n"
    assert not is_noise(error, 2) and is_noise(error, 3)
    assert not is_noise("tl-embed: error: the disk is full\n", 2)
    assert not is_noise("UserWarning: something a user should see\n", 2)
    assert not any(is_noise(line, 0) for line in TF_LINES)  # TF_CPP_MIN_LOG_LEVEL=0: the user wants them all
    assert not is_noise(TF_LINES[-1], 1) and is_noise(TF_LINES[1], 1)


@pytest.mark.parametrize(("level", "expected"), [(None, ["kept 1", "kept 2"]), ("0", None)])
def test_lines_written_to_descriptor_2_during_the_first_import_are_filtered(level, expected):
    """C++ writes go straight to fd 2, below Python: write them there, as TensorFlow does."""
    code = textwrap.dedent(f"""
        import os, sys
        from tl_embed import tf_quiet
        with tf_quiet.filtered_stderr(tf_quiet.min_log_level()):
            for line in {TF_LINES!r}:
                os.write(2, line.encode())
            os.write(2, b"kept 1\\n")
            print("kept 2", file=sys.stderr)
        print("after", file=sys.stderr)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    if expected is None:  # level 0: nothing filtered, nothing lost
        assert len(lines) == len(TF_LINES) + 3
    else:
        assert lines == [*expected, "after"]


@pytest.mark.parametrize("command", [
    ["embed", "{images}", "--out", "{tmp}/s.tle", "-q"],  # imagenet weights, none in this KERAS_HOME
    ["classify", "{images}"],
])
def test_user_error_after_importing_tensorflow_is_one_line(tmp_path, image_folder, command):
    """No TF_CPP_MIN_LOG_LEVEL from the caller: the command's own settings must keep TensorFlow quiet."""
    argv = [a.format(images=image_folder, tmp=tmp_path) for a in command]
    code = textwrap.dedent(f"""
        import sys
        from tl_embed.cli import main
        status = main({argv!r})
        assert "tensorflow" in sys.modules, "the error came before TensorFlow was imported"
        sys.exit(status)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["KERAS_HOME"] = str(tmp_path / "empty-keras-home")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tl-embed: error:") and "weights" in lines[0], lines
