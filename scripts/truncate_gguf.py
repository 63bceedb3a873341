"""Cuts a llama-family GGUF file down to its first K blocks (same metadata, tokenizer, embeddings,
final norm and output; `<arch>.block_count = K`), so that a real checkpoint small enough to carry
can be compared between devices (scripts/device_bench.sh). Quantized tensors are copied as they
are.

  python3 scripts/truncate_gguf.py IN.gguf OUT.gguf K [--q4-embeddings]

--q4-embeddings re-quantizes the token embeddings to Q4_0 (SmolLM2's Q8_0 table is 30 MB of a
file that must fit in a 64 MiB transfer with the other test data); the result is then a
slightly different model, which is all a device-agreement test needs.

Needs the `gguf` package (pip install gguf).
"""
import sys

from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants


def main():
    src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    q4_embeddings = "--q4-embeddings" in sys.argv[4:]
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == f"{arch}.block_count":
            writer.add_uint32(name, k)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    kept = []
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= k:
            continue
        kept.append(t)
    data = {}
    for t in kept:
        if q4_embeddings and t.name == "token_embd.weight" and t.tensor_type != Q.Q4_0:
            data[t.name] = (quants.quantize(quants.dequantize(t.data, t.tensor_type), Q.Q4_0), Q.Q4_0)
        else:
            data[t.name] = (t.data, t.tensor_type)
    for t in kept:
        d, q = data[t.name]
        writer.add_tensor_info(t.name, d.shape, d.dtype, d.nbytes, q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(data[t.name][0])
    writer.close()
    print(f"{dst}: {len(kept)} tensors, {k} blocks of {arch}")


if __name__ == "__main__":
    main()
