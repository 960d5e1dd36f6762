"""The codec pipeline every project array uses: Blosc-zstd with a byte or bit shuffle, then a
CRC-32C checksum, so every chunk is verified when it is read (the sharding codec only
checksums its index)."""

from zarr.codecs import BloscCodec, Crc32cCodec


def checked_compressors(*, shuffle: str = "shuffle", level: int = 3) -> list:
    """Compressors for `zarr.create_array`: compress, then checksum each chunk."""
    return [BloscCodec(cname="zstd", clevel=level, shuffle=shuffle), Crc32cCodec()]
