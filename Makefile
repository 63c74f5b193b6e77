# mergestream - one plain Makefile (DESIGN.md section 5).
#
#   make              build build/mergestream and the helper tools
#   make demo         generate the bundled example models and merge them
#   make check        run every test, plainly and under ASan+UBSan; the engine and
#                     outputs under TSan (check-tsan)
#   make test         run every test once (no sanitizers)
#   make SANITIZE=address,undefined   sanitized build (into build/san)
#   make check-layers check the folder dependency graph on the built objects
#   make fuzz         build and briefly run the libFuzzer harnesses (clang)
#   make fmt          clang-format the lines changed since the last commit
#   make deps         install missing Debian packages (as root) or say which
#
# Missing libraries are installed with apt-get when make runs as root; otherwise
# make prints the apt-get line and stops.

CC      ?= cc
BUILD   ?= build
SANITIZE ?=

ifneq ($(SANITIZE),)
  ifeq ($(BUILD),build)
    ifeq ($(SANITIZE),thread)
      BUILD := build/tsan
    else
      BUILD := build/san
    endif
  endif
endif

PKGS      := libuv libzstd yaml-0.1 jansson
DEB_PKGS  := libuv1-dev libzstd-dev libyaml-dev libjansson-dev libcriterion-dev pkg-config zstd tar rclone clang libclang-rt-14-dev
# Recursive (=) so pkg-config runs after the deps step has installed things.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null)
CRIT_CFLAGS = $(shell pkg-config --cflags criterion 2>/dev/null)
CRIT_LIBS   = $(shell pkg-config --libs criterion 2>/dev/null)

WARN   := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wpointer-arith -Wvla -Wformat=2 \
          -Wundef -Wwrite-strings -Wno-unused-parameter -Wno-format-truncation
ifeq ($(CI),true)
  WARN += -Werror
endif
OPT    ?= -O2 -g
CFLAGS_ALL = -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE $(OPT) $(WARN) \
             -ffp-contract=off -fno-strict-aliasing -Iinclude -MMD -MP $(PKG_CFLAGS) $(CFLAGS)
# io/json_alloc.c routes jansson's allocations through ms_malloc from a constructor,
# which nothing calls: name it so that the linker takes it out of the archive.
LDLIBS_ALL = -Wl,--require-defined=ms__json_alloc_hook $(PKG_LIBS) -lm -lpthread $(LDLIBS)
ifneq ($(SANITIZE),)
  CFLAGS_ALL += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
  LDFLAGS    += -fsanitize=$(SANITIZE)
endif

LIB_SRCS  := $(wildcard base/*.c io/*.c stages/*.c pipeline/*.c)
LIB_OBJS  := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)
LIB       := $(BUILD)/libmergestream.a

CLI_SRCS  := $(wildcard tools/cli_*.c) tools/mergestream.c
CLI_OBJS  := $(CLI_SRCS:%.c=$(BUILD)/obj/%.o)
CLI       := $(BUILD)/mergestream

# Every other tools/ms-*.c is a standalone helper program.
TOOL_SRCS := $(wildcard tools/ms-*.c)
TOOLS     := $(TOOL_SRCS:tools/%.c=$(BUILD)/%)

TEST_SRCS := $(wildcard tests/test_*.c)
TESTS     := $(TEST_SRCS:tests/%.c=$(BUILD)/tests/%)
TEST_HELP := $(wildcard tests/th_*.c)
TEST_HELP_OBJS := $(TEST_HELP:%.c=$(BUILD)/obj/%.o)

DEPS_STAMP := build/.deps-ok

.PHONY: all deps demo test check check-san check-tsan check-layers fuzz bench clean fmt

all: $(CLI) $(TOOLS)

# ---------------------------------------------------------------- dependencies
deps: $(DEPS_STAMP)
$(DEPS_STAMP):
	@mkdir -p build
	@missing=""; \
	for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make: installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >build/apt.log 2>&1 \
	      || { echo "make: apt-get failed, see build/apt.log"; tail -5 build/apt.log; exit 1; }; \
	  else \
	    echo "make: missing packages; run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi
	@touch $@

# ---------------------------------------------------------------- build
$(BUILD)/obj/%.o: %.c | $(DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

# Compute kernels: -O3 lets gcc vectorise loops whose trip count is not known.
$(BUILD)/obj/stages/%.o: stages/%.c | $(DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -O3 -c $< -o $@

$(BUILD)/obj/base/dtype.o: base/dtype.c | $(DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -O3 -c $< -o $@

$(BUILD)/obj/tests/%.o: tests/%.c | $(DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(CRIT_CFLAGS) -DMS_BUILD_DIR='"$(abspath $(BUILD))"' -DMS_SOURCE_DIR='"$(CURDIR)"' -c $< -o $@

$(LIB): $(LIB_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(CLI): $(CLI_OBJS) $(LIB)
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJS) $(LIB) $(LDLIBS_ALL)

$(BUILD)/ms-%: $(BUILD)/obj/tools/ms-%.o $(LIB)
	$(CC) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS_ALL)

$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(TEST_HELP_OBJS) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< $(TEST_HELP_OBJS) $(LIB) $(CRIT_LIBS) $(LDLIBS_ALL)

# ---------------------------------------------------------------- run
demo: all
	@sh tools/demo.sh $(BUILD)

test: all $(TESTS)
	@sh tests/run.sh $(BUILD) $(TESTS)

# Folder dependencies and method names (docs/ARCHITECTURE.md), checked on the objects.
check-layers: all
	@sh tools/check-layers.sh $(BUILD)

check-san:
	@$(MAKE) --no-print-directory SANITIZE=address,undefined test

# ThreadSanitizer: Criterion's runner crashes under TSan, so tests/tsan.sh runs the
# engine and the output sinks through the CLI of a SANITIZE=thread build.
check-tsan:
	@$(MAKE) --no-print-directory SANITIZE=thread all
	@sh tests/tsan.sh build/tsan

check: deps
	@$(MAKE) --no-print-directory test
	@$(MAKE) --no-print-directory check-layers
	@$(MAKE) --no-print-directory check-san
	@$(MAKE) --no-print-directory check-tsan

fuzz: | $(DEPS_STAMP)
	@sh tests/fuzz/run.sh $(FUZZ_SECONDS)

bench: all
	@sh tools/bench.sh $(BUILD)

# Formats only the lines changed since the last commit (.clang-format says why).
fmt:
	git clang-format --style=file --extensions c,h

clean:
	rm -rf build

-include $(wildcard $(BUILD)/obj/*/*.d $(BUILD)/obj/tests/*.d)
