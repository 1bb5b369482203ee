// Raw sensor readings (a 16-bit signed integer, little-endian, as an ADC gives
// them) to JSON with a physical value: value = raw * scale + offset.
//
// Params: `scale` (default 1), `offset` (default 0), `unit` (default none).
// Output: `scaled`. A value that is not exactly 2 bytes fails (dead-letter topic).
//
// Ownership follows wit-bindgen's C conventions: the inputs belong to this code
// (freed before returning); everything returned is malloc'ed and freed by the
// generated post-return function after the host copied it out.

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

static double scale = 1.0;
static double offset = 0.0;
static char unit[32] = "";

static void set_error(plugin_string_t *err, const char *fmt, const char *arg) {
  char buf[160];
  snprintf(buf, sizeof buf, fmt, arg);
  plugin_string_dup(err, buf);
}

static int parse_number(const plugin_string_t *s, double *out) {
  char buf[64];
  if (s->len == 0 || s->len >= sizeof buf) return 0;
  memcpy(buf, s->ptr, s->len);
  buf[s->len] = 0;
  char *end;
  *out = strtod(buf, &end);
  return *end == 0;
}

static int is(const plugin_string_t *s, const char *name) {
  return s->len == strlen(name) && memcmp(s->ptr, name, s->len) == 0;
}

bool exports_plugin_init(plugin_list_tuple2_string_string_t *params, plugin_string_t *err) {
  bool ok = true;
  for (size_t i = 0; i < params->len && ok; i++) {
    plugin_string_t *key = &params->ptr[i].f0, *value = &params->ptr[i].f1;
    char name[64];
    snprintf(name, sizeof name, "%.*s", (int)key->len, (const char *)key->ptr);
    if (is(key, "scale") || is(key, "offset")) {
      if (!parse_number(value, is(key, "scale") ? &scale : &offset)) {
        set_error(err, "param `%s` must be a number", name);
        ok = false;
      }
    } else if (is(key, "unit")) {
      if (value->len >= sizeof unit) {
        set_error(err, "param `%s` is too long", name);
        ok = false;
      } else {
        memcpy(unit, value->ptr, value->len);
        unit[value->len] = 0;
      }
    } else {
      set_error(err, "unknown param `%s` (known: scale, offset, unit)", name);
      ok = false;
    }
  }
  plugin_list_tuple2_string_string_free(params);
  if (ok) {
    plugin_string_t line;
    char buf[96];
    snprintf(buf, sizeof buf, "c-scale: value = raw * %g + %g %s", scale, offset, unit);
    plugin_string_set(&line, buf);
    weir_plugin_host_log(WEIR_PLUGIN_TYPES_LEVEL_INFO, &line);
#ifdef SCALE_LOG_TO_STDERR
    // libc's stdio: the module then imports WASI preview1 (fd_write), which
    // `weir plugin componentize` links the adapter in for.
    fprintf(stderr, "%s\n", buf);
#endif
  }
  return ok;
}

static void copy_bytes(plugin_option_list_u8_t *to, const plugin_option_list_u8_t *from) {
  to->is_some = from->is_some;
  to->val.len = from->val.len;
  to->val.ptr = NULL;
  if (from->is_some && from->val.len > 0) {
    to->val.ptr = malloc(from->val.len);
    memcpy(to->val.ptr, from->val.ptr, from->val.len);
  }
}

void exports_plugin_process(plugin_source_t *source, plugin_list_input_record_t *records,
                            plugin_batch_result_t *ret) {
  size_t n = records->len;
  weir_plugin_types_output_record_t *outputs = calloc(n ? n : 1, sizeof *outputs);
  weir_plugin_types_failure_t *failures = calloc(n ? n : 1, sizeof *failures);
  size_t out = 0, failed = 0;
  for (size_t i = 0; i < n; i++) {
    plugin_input_record_t *r = &records->ptr[i];
    if (!r->value.is_some || r->value.val.len != 2) {
      char reason[96];
      snprintf(reason, sizeof reason, "expected 2 bytes (int16, little-endian), got %zu",
               r->value.is_some ? r->value.val.len : 0);
      failures[failed].input = (uint32_t)i;
      plugin_string_dup(&failures[failed].reason, reason);
      failed++;
      continue;
    }
    const uint8_t *b = r->value.val.ptr;
    int16_t raw = (int16_t)(b[0] | (b[1] << 8));
    char json[160];
    int len = snprintf(json, sizeof json, "{\"raw\":%d,\"value\":%.4g,\"unit\":\"%s\"}", raw,
                       raw * scale + offset, unit);
    weir_plugin_types_output_record_t *o = &outputs[out++];
    o->input = (uint32_t)i;
    plugin_string_dup(&o->target, "scaled");
    copy_bytes(&o->key, &r->key);
    o->value.is_some = true;
    o->value.val.len = (size_t)len;
    o->value.val.ptr = malloc((size_t)len);
    memcpy(o->value.val.ptr, json, (size_t)len);
    o->headers.ptr = NULL;
    o->headers.len = 0;
  }
  ret->outputs.ptr = outputs;
  ret->outputs.len = out;
  ret->failures.ptr = failures;
  ret->failures.len = failed;
  plugin_source_free(source);
  plugin_list_input_record_free(records);
}
