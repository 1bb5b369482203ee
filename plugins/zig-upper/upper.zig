//! A Weir plugin in Zig: each record's value upper-cased (ASCII), after an optional
//! `prefix` param, on output `upper`; a value that is missing or not ASCII fails to
//! the dead letters. The ABI glue is wit-bindgen's C (`gen/plugin.c`), its header
//! taken through `zig translate-c` (Zig 0.17 has no `@cImport`); memory as
//! wasm-sdk/README.md says: inputs are ours to free, what we return is malloc'ed.
const std = @import("std");
const c = @import("plugin.zig");

var prefix_buf: [64]u8 = undefined;
var prefix_len: usize = 0;

/// A malloc'ed copy of `text` in `out` (the post-return code frees it).
fn dupString(out: *c.plugin_string_t, text: []const u8) void {
    const ptr: [*]u8 = @ptrCast(std.c.malloc(@max(text.len, 1)) orelse @panic("out of memory"));
    @memcpy(ptr[0..text.len], text);
    out.ptr = ptr;
    out.len = text.len;
}

fn log(text: []const u8) void {
    // Borrowed: the host copies it during the call.
    var line = c.plugin_string_t{ .ptr = @constCast(text.ptr), .len = text.len };
    c.weir_plugin_host_log(c.WEIR_PLUGIN_TYPES_LEVEL_INFO, &line);
}

export fn exports_plugin_init(params: *c.plugin_list_tuple2_string_string_t, err: *c.plugin_string_t) bool {
    var ok = true;
    for (params.ptr[0..params.len]) |kv| {
        const key = kv.f0.ptr[0..kv.f0.len];
        const value = kv.f1.ptr[0..kv.f1.len];
        if (std.mem.eql(u8, key, "prefix") and value.len <= prefix_buf.len) {
            @memcpy(prefix_buf[0..value.len], value);
            prefix_len = value.len;
        } else {
            dupString(err, "unknown param, or a prefix over 64 bytes (known: prefix)");
            ok = false;
            break;
        }
    }
    c.plugin_list_tuple2_string_string_free(params);
    if (ok) log("zig-upper: ready");
    return ok;
}

export fn exports_plugin_process(source: *c.plugin_source_t, records: *c.plugin_list_input_record_t, ret: *c.plugin_batch_result_t) void {
    const n = records.len;
    const outputs: [*]c.weir_plugin_types_output_record_t = @ptrCast(@alignCast(std.c.malloc(@max(n, 1) * @sizeOf(c.weir_plugin_types_output_record_t)) orelse @panic("out of memory")));
    const failures: [*]c.weir_plugin_types_failure_t = @ptrCast(@alignCast(std.c.malloc(@max(n, 1) * @sizeOf(c.weir_plugin_types_failure_t)) orelse @panic("out of memory")));
    var out: usize = 0;
    var failed: usize = 0;
    for (records.ptr[0..n], 0..) |r, i| {
        const value: []const u8 = if (r.value.is_some) r.value.val.ptr[0..r.value.val.len] else &.{};
        const ascii = for (value) |b| {
            if (b >= 0x80) break false;
        } else true;
        if (!r.value.is_some or !ascii) {
            failures[failed].input = @intCast(i);
            dupString(&failures[failed].reason, if (r.value.is_some) "not ASCII" else "no value");
            failed += 1;
            continue;
        }
        const o = &outputs[out];
        out += 1;
        o.input = @intCast(i);
        dupString(&o.target, "upper");
        o.key.is_some = r.key.is_some;
        o.key.val.len = 0;
        o.key.val.ptr = null;
        if (r.key.is_some) {
            var k: c.plugin_string_t = undefined;
            dupString(&k, r.key.val.ptr[0..r.key.val.len]);
            o.key.val.ptr = k.ptr;
            o.key.val.len = k.len;
        }
        const len = prefix_len + value.len;
        const bytes: [*]u8 = @ptrCast(std.c.malloc(@max(len, 1)) orelse @panic("out of memory"));
        @memcpy(bytes[0..prefix_len], prefix_buf[0..prefix_len]);
        for (value, 0..) |b, j| bytes[prefix_len + j] = std.ascii.toUpper(b);
        o.value.is_some = true;
        o.value.val.ptr = bytes;
        o.value.val.len = len;
        o.headers.ptr = null;
        o.headers.len = 0;
    }
    ret.outputs.ptr = outputs;
    ret.outputs.len = out;
    ret.failures.ptr = failures;
    ret.failures.len = failed;
    c.plugin_source_free(source);
    c.plugin_list_input_record_free(records);
}
