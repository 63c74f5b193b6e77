/*
 * ms_safetensors.h - safetensors files and models: read and validate headers,
 * open single-file and sharded models, plan and write output shards.
 *
 * Ownership: an ms_st_file owns its tensor array and every string in it; an
 * ms_model owns its shards. Pointers returned by the find functions are
 * borrowed and live as long as the file or model. All functions here are
 * synchronous and may be called from any thread; the only shared state is the
 * header limit, set once (ms_st_set_memory) before any file is opened.
 */
#ifndef MS_SAFETENSORS_H
#define MS_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ms_dtype.h"

#define MS_MAX_DIMS 8
#define MS_ST_MAX_HEADER 100000000ull  /* safetensors' own limit on N, bytes */
/* A header is parsed whole in memory (jansson's tree): measured ~12.5 times its
 * size at peak (a 54 MB header: 667 MB RSS); MS_ST_HEADER_COST is that with a
 * margin. Headers up to MS_ST_HEADER_FLOOR always pass (their parse fits in the
 * 32 MiB above --max-memory that the memory rule allows). */
#define MS_ST_HEADER_COST 16u
#define MS_ST_HEADER_FLOOR (2ull << 20)

/*
 * Sets the memory budget header parsing must stay within (--max-memory, bytes):
 * from then on a header (N) over max(MS_ST_HEADER_FLOOR, max_memory /
 * MS_ST_HEADER_COST), and never over MS_ST_MAX_HEADER, is refused with
 * MS_EST_TOOLARGE naming the file, the limit and --max-memory, before it is
 * read. Default: as for 512 MiB (a 32 MiB limit). Call from the main thread
 * before any file is opened; not synchronised with concurrent opens.
 */
void ms_st_set_memory(uint64_t max_memory);
/* The current header limit in bytes (see ms_st_set_memory). */
uint64_t ms_st_header_limit(void);

struct ms_st_tensor {
    char *name;                   /* UTF-8, NUL-terminated */
    enum ms_dtype dtype;
    uint32_t ndim;                /* 0 for a scalar */
    int64_t shape[MS_MAX_DIMS];
    uint64_t numel;               /* product of shape (1 for a scalar) */
    uint64_t begin, end;          /* data_offsets: bytes, relative to the data region */
};

struct ms_st_file {
    char *path;                   /* as opened */
    uint64_t file_size;           /* bytes */
    uint64_t header_len;          /* N, the JSON length that follows the 8-byte prefix */
    uint64_t data_start;          /* 8 + N: file offset of the data region */
    size_t ntensors;
    struct ms_st_tensor *tensors; /* sorted by begin, then end, then name (empty tensors
                                     sharing an offset precede the tensor starting there) */
    char *format;                 /* __metadata__.format, or NULL */
    bool compressed;              /* a .safetensors.zst file: file_size and every offset are
                                     those of the decompressed stream (read with ms_zsrc) */
};

/*
 * Reads and validates the header of the safetensors file at path (a path
 * ending in ".zst" is read through zstd decompression) with every
 * check the official reader makes (peers-and-formats.md 5.2) plus duplicate
 * names. On failure returns an MS_EST_* code (or an I/O code) and a one-line
 * diagnostic naming the file and, where there is one, the tensor.
 */
int ms_st_open(const char *path, struct ms_st_file **out);
/*
 * The same validation over a header already in memory: buf holds the first
 * buf_len bytes of a file of file_size bytes (buf_len >= min(file_size, 8 + N)
 * is required for success). `path` is only used in messages. For fuzzing.
 */
int ms_st_parse(const char *path, const void *buf, size_t buf_len, uint64_t file_size,
                struct ms_st_file **out);
void ms_st_free(struct ms_st_file *f);
/* Binary or linear search by name; NULL if absent. */
const struct ms_st_tensor *ms_st_find(const struct ms_st_file *f, const char *name);

/* A model: one safetensors file, or shards listed by model.safetensors.index.json. */
struct ms_model {
    char *path;                   /* as given (directory or file) */
    char *dir;                    /* directory that holds the files */
    bool indexed;                 /* loaded through an index file */
    size_t nshards;
    struct ms_st_file **shards;   /* shard files, index order */
    size_t ntensors;              /* over all shards */
    void *lookup;                 /* private name -> (shard, tensor) table */
};

/*
 * Opens a model: `path` is an http(s) URL of a directory or a .safetensors file
 * (ms_http.h: headers and index by range requests, shard names limited to
 * [A-Za-z0-9._-/]), or a directory holding model.safetensors.index.json
 * (preferred), model.safetensors or model.safetensors.zst, or a path to a
 * .safetensors(.zst) file. Index entries may name .safetensors.zst shards. A directory
 * that has only pytorch_model.bin(.index.json) fails with MS_EUNSUPPORTED. With an
 * index, every shard header is validated and the weight_map is cross-checked
 * against the shards both ways (MS_EST_INDEX names the tensor and the files).
 */
int ms_model_open(const char *path, struct ms_model **out);
void ms_model_free(struct ms_model *m);
/*
 * Reads the small file `name` (e.g. "config.json") beside the model's weights,
 * from its directory or, for a remote model, its URL (ms_http_get_file). Returns 1
 * with *data (NUL-terminated, ms_free) and *len; 0 when there is no such regular
 * file (HTTP 404); or a negative code with a diagnostic naming the file.
 */
int ms_model_read_file(const struct ms_model *m, const char *name, char **data, size_t *len);
/* Looks a tensor up by name; sets *shard (index into shards) if non-NULL. NULL if absent. */
const struct ms_st_tensor *ms_model_find(const struct ms_model *m, const char *name,
                                         uint32_t *shard);
/* Iterates all tensors of the model in shard order then file order: i in [0, ntensors). */
const struct ms_st_tensor *ms_model_tensor_at(const struct ms_model *m, size_t i, uint32_t *shard);

/*
 * Output layout. The caller lists the output tensors in save order (mergekit's
 * order, mergekit-spec.md 6.2); ms_layout_build splits them into shards with
 * mergekit's greedy rule (4.1), names the files (model.safetensors, or
 * model-%05d-of-%05d.safetensors), orders each shard's tensors as the official
 * writer does (dtype descending, then name), assigns contiguous offsets and
 * renders each shard's header (8-byte length + JSON with __metadata__
 * {"format":"pt"}, padded with spaces to a multiple of 8).
 */
struct ms_out_tensor {
    const char *name;             /* borrowed from the caller for the layout's life */
    enum ms_dtype dtype;
    uint32_t ndim;
    int64_t shape[MS_MAX_DIMS];
    uint64_t nbytes;              /* numel * element size */
    /* filled by ms_layout_build: */
    uint32_t shard;
    uint64_t begin;               /* data_offsets begin within the shard's data region */
    uint64_t file_offset;         /* absolute offset in the shard file: header_bytes + begin */
};

struct ms_out_shard {
    char *file_name;              /* e.g. "model-00001-of-00003.safetensors" */
    size_t ntensors;
    size_t *order;                /* indices into layout tensors, in file (offset) order */
    unsigned char *header;        /* 8-byte LE length + padded JSON */
    uint64_t header_bytes;        /* length of header[] */
    uint64_t data_bytes;          /* sum of tensor nbytes */
    uint64_t file_bytes;          /* header_bytes + data_bytes */
};

struct ms_layout {
    size_t ntensors;
    struct ms_out_tensor *tensors; /* save order, as given */
    size_t nshards;
    struct ms_out_shard *shards;
    uint64_t total_bytes;          /* sum of tensor nbytes (the index's total_size) */
};

/* max_shard_bytes == 0 disables splitting. Copies `t`. */
int ms_layout_build(const struct ms_out_tensor *t, size_t n, uint64_t max_shard_bytes,
                    struct ms_layout **out);
void ms_layout_free(struct ms_layout *l);
/*
 * Renders model.safetensors.index.json exactly as mergekit writes it (Python
 * json.dump indent=2, metadata {total_size, mergekit_version "0.1.4"}, weight_map
 * in save order, no trailing newline). Only meaningful for nshards > 1.
 * *json is NUL-terminated and owned by the caller (ms_free).
 */
int ms_layout_index_json(const struct ms_layout *l, char **json, size_t *len);

/*
 * Writes one complete safetensors file: data[i] holds t[i].nbytes bytes. Tensors
 * are ordered and offset as in ms_layout_build (a single shard). The file is
 * written as "<path>.tmp", fsynced, then renamed to path and the directory
 * fsynced; on failure nothing is left under either name.
 */
int ms_st_write_file(const char *path, const struct ms_out_tensor *t, const void *const *data,
                     size_t n);

/* Writes a whole small file atomically (tmp, fsync, rename, dir fsync). */
int ms_write_file_atomic(const char *path, const void *data, size_t len);
/* The same with the new file's permission bits (0644 for ms_write_file_atomic;
 * the umask applies). */
int ms_write_file_atomic_mode(const char *path, const void *data, size_t len, unsigned mode);
/* Bytes ms_read_file accepts: a tokenizer.json is tens of MB at most. */
#define MS_SMALL_FILE_MAX (256u << 20)
/* Reads a whole small file (config.json, index, tokenizer files) into a NUL-terminated
 * buffer (ms_free). Only regular files of at most MS_SMALL_FILE_MAX bytes (symlinks are
 * followed): anything else is MS_EIO with a message naming the file. */
int ms_read_file(const char *path, char **data, size_t *len);

#endif
