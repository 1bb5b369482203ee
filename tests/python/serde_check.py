"""Checks the serialization plugins with decoders of their own formats.

    serde_check.py descriptor          prints a FileDescriptorSet (base64) of weir.example.Reading
    serde_check.py decode BOOTSTRAP    prints, as JSON lines, the records of readings-avro
                                       (fastavro, Confluent framing, schema id 7) and readings-pb
                                       (the protobuf runtime)
"""

import base64
import json
import struct
import sys

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.json_format import MessageToDict

AVRO_SCHEMA = {
    "type": "record",
    "name": "Reading",
    "namespace": "weir.example",
    "fields": [
        {"name": "device", "type": "string"},
        {"name": "temperature", "type": "double"},
        {"name": "ts_ms", "type": "long"},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}


def file_descriptor_set():
    f = descriptor_pb2.FileDescriptorProto(name="reading.proto", package="weir.example", syntax="proto3")
    m = f.message_type.add(name="Reading")
    T = descriptor_pb2.FieldDescriptorProto
    for number, (name, kind, label) in enumerate(
        [
            ("device", T.TYPE_STRING, T.LABEL_OPTIONAL),
            ("temperature", T.TYPE_DOUBLE, T.LABEL_OPTIONAL),
            ("ts_ms", T.TYPE_INT64, T.LABEL_OPTIONAL),
            ("tags", T.TYPE_STRING, T.LABEL_REPEATED),
        ],
        start=1,
    ):
        m.field.add(name=name, number=number, type=kind, label=label, json_name=name if "_" not in name else "tsMs")
    return descriptor_pb2.FileDescriptorSet(file=[f])


def reading_class():
    pool = descriptor_pool.DescriptorPool()
    for f in file_descriptor_set().file:
        pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("weir.example.Reading"))


def records(bootstrap, topic):
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    out = list(consumer)
    consumer.close()
    return sorted(out, key=lambda r: (r.partition, r.offset))


def main():
    if sys.argv[1] == "descriptor":
        print(base64.b64encode(file_descriptor_set().SerializeToString()).decode())
        return
    if sys.argv[1] == "avro-schema":
        print(json.dumps(AVRO_SCHEMA))
        return
    import fastavro
    import io

    bootstrap = sys.argv[2]
    schema = fastavro.parse_schema(AVRO_SCHEMA)
    for r in records(bootstrap, "readings-avro"):
        magic, schema_id = struct.unpack(">bI", r.value[:5])
        assert (magic, schema_id) == (0, 7), (magic, schema_id)
        value = fastavro.schemaless_reader(io.BytesIO(r.value[5:]), schema)
        print(json.dumps({"topic": "avro", "key": r.key.decode(), "value": value}, sort_keys=True))
    Reading = reading_class()
    for r in records(bootstrap, "readings-pb"):
        message = Reading()
        message.ParseFromString(r.value)
        value = MessageToDict(message, preserving_proto_field_name=True)
        print(json.dumps({"topic": "pb", "key": r.key.decode(), "value": value}, sort_keys=True))


if __name__ == "__main__":
    main()
