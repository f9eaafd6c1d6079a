import pytest

from llmjax.train.tensorboard import EventWriter, crc32c, masked_crc, read_events


def test_crc32c_known_values():
    # RFC 3720 test vectors for CRC-32C.
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert masked_crc(b"") == 0xA282EAD8


def test_events_read_back(tmp_path):
    w = EventWriter(tmp_path)
    w.scalars(3, {"loss": 2.5, "learning_rate": 1e-3})
    w.scalars(2**40, {"loss": -1.25})
    w.close()
    events = read_events(w.path)
    assert events[0]["file_version"] == "brain.Event:2"
    assert [e["step"] for e in events[1:]] == [3, 2**40]
    assert events[1]["scalars"] == {"loss": 2.5, "learning_rate": pytest.approx(1e-3)}
    assert events[2]["scalars"] == {"loss": -1.25}
    data = bytearray(w.path.read_bytes())
    data[-6] ^= 1
    w.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_events(w.path)


def test_tensorboard_reads_our_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = EventWriter(tmp_path)
    for step in range(1, 6):
        w.scalars(step, {"loss": 10.0 / step})
    w.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"]
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(s, pytest.approx(10.0 / s)) for s in range(1, 6)]
