"""The Data Buffer: prompt groups out to the rollout, finished groups in, train groups out within the staleness
bound; see data_buffer.py."""

from sluice.buffer.data_buffer import BufferFull, DataBuffer

__all__ = ["BufferFull", "DataBuffer"]
