"""Paged KV-cache bookkeeping: fixed-size blocks of slots, handed to sequences as they grow.

The KV tensors themselves are a `model.attention.KVPool` of `num_blocks * block_size` slots; this file
only decides which slots belong to which sequence (vLLM's block tables). A sequence's slot list is
kept incrementally, so building a step's attention metadata costs nothing per token in Python.
"""

from __future__ import annotations


class OutOfBlocks(Exception):
    pass


class BlockTable:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.blocks: list[int] = []
        self.slots: list[int] = []  # slot of every position that has been allocated

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one slot")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(table.blocks) <= len(self.free)

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Make `table` hold at least `num_tokens` positions; all or nothing."""
        need = self.blocks_for(num_tokens) - len(table.blocks)
        if need > len(self.free):
            raise OutOfBlocks
        bs = self.block_size
        for _ in range(need):
            b = self.free.pop()
            table.blocks.append(b)
            table.slots.extend(range(b * bs, (b + 1) * bs))

    def release(self, table: BlockTable) -> None:
        """Give the table's blocks back; the table is left empty, so a second release frees nothing."""
        self.free.extend(reversed(table.blocks))
        table.blocks.clear()
        table.slots.clear()
