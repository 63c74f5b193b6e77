# mergestream - one plain Makefile (DESIGN.md section 5).
#
#   make              build build/mergestream, its man page and completions, the helper tools
#   make install      install them under $(DESTDIR)$(PREFIX) (PREFIX=/usr/local); make uninstall
#   make demo         generate the bundled example models and merge them
#   make check        run every test, plainly and under ASan+UBSan; the engine and
#                     outputs under TSan (check-tsan)
#   make test         run every test once (no sanitizers)
#   make SANITIZE=address,undefined   sanitized build (into build/san)
#   make check-layers check the folder dependency graph on the built objects
#   make check-deb    build the Debian package from a copy of the tree, install it, run it
#   make fuzz         build and briefly run the libFuzzer harnesses (clang)
#   make fmt          clang-format the lines changed since the last commit
#   make deps         install missing Debian packages (as root) or say which
#
# Plain `make` needs only a C and a C++ compiler, pkg-config and the six libraries (libuv,
# zstd, libyaml, jansson, libcurl, and libsentencepiece for io/spm.cc, the one C++ file),
# found through pkg-config on any system. When pkg-config cannot find
# them, make installs the Debian packages with apt-get if it runs as root on Debian, and
# otherwise says what is missing and stops. The test toolchain (Criterion, zstd, tar,
# rclone, clang, libclang-rt, debhelper, zsh, nginx, sentencepiece's spm_train) is needed
# only by the test, fuzz and package targets, which install or ask for it the same way.

CC      ?= cc
CXX     ?= c++
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

PKGS      := libuv libzstd yaml-0.1 jansson libcurl sentencepiece
DEB_BUILD_PKGS := libuv1-dev libzstd-dev libyaml-dev libjansson-dev libcurl4-openssl-dev \
                  libsentencepiece-dev g++ pkg-config
DEB_TEST_PKGS  := libcriterion-dev zstd tar rclone clang libclang-rt-14-dev debhelper dpkg-dev zsh nginx python3-jinja2 \
                  sentencepiece
# Recursive (=) so pkg-config runs after the deps step has installed things. sentencepiece.pc
# also names the trainer library, which nothing here uses; io/spm.cc needs the C++ runtime.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(filter-out -lsentencepiece_train,$(shell pkg-config --libs $(PKGS) 2>/dev/null)) -lstdc++
CRIT_CFLAGS = $(shell pkg-config --cflags criterion 2>/dev/null)
CRIT_LIBS   = $(shell pkg-config --libs criterion 2>/dev/null)

WARN   := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wpointer-arith -Wvla -Wformat=2 \
          -Wundef -Wwrite-strings -Wno-unused-parameter -Wno-format-truncation
ifeq ($(CI),true)
  WARN += -Werror
endif
OPT    ?= -O2 -g
CFLAGS_ALL = -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE $(OPT) $(WARN) \
             -ffp-contract=off -fno-strict-aliasing -Iinclude -MMD -MP $(PKG_CFLAGS) $(CPPFLAGS) $(CFLAGS)
# io/json_alloc.c routes jansson's allocations through ms_malloc from a constructor,
# which nothing calls: name it so that the linker takes it out of the archive.
LDLIBS_ALL = -Wl,--require-defined=ms__json_alloc_hook $(PKG_LIBS) -lm -lpthread $(LDLIBS)
# The C++ shim (io/spm.cc): the same warnings that C++ knows, no exceptions leave it.
CXXFLAGS_ALL = -std=c++17 $(OPT) -Wall -Wextra -Wshadow -Wpointer-arith -Wformat=2 -Wundef \
               -Wno-unused-parameter -ffp-contract=off -Iinclude -MMD -MP $(PKG_CFLAGS) \
               $(CPPFLAGS) $(CXXFLAGS)
ifeq ($(CI),true)
  CXXFLAGS_ALL += -Werror
endif
ifneq ($(SANITIZE),)
  CFLAGS_ALL += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
  CXXFLAGS_ALL += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
  LDFLAGS    += -fsanitize=$(SANITIZE)
endif

LIB_SRCS  := $(wildcard base/*.c io/*.c stages/*.c pipeline/*.c)
LIB_CXX_SRCS := $(wildcard io/*.cc)
LIB_OBJS  := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o) $(LIB_CXX_SRCS:%.cc=$(BUILD)/obj/%.o)
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

# The man page and shell completions, generated from the built binary's --help.
DOCS      := $(BUILD)/mergestream.1 $(BUILD)/completions/mergestream.bash \
             $(BUILD)/completions/_mergestream

BUILD_DEPS_STAMP := build/.build-deps-ok
TEST_DEPS_STAMP  := build/.test-deps-ok

PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
MANDIR     ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
INSTALL    ?= install

.PHONY: all deps build-deps test-deps install uninstall demo test check check-san check-tsan check-layers \
        check-deb fuzz bench clean fmt

all: $(CLI) $(TOOLS) $(DOCS)

# ---------------------------------------------------------------- dependencies
# apt_install WHAT PACKAGES: installs the missing ones as root with apt-get, or says
# which to install and stops.
define apt_install
	@mkdir -p build
	@missing=""; \
	if ! command -v dpkg >/dev/null 2>&1; then \
	  echo "make: $(1) missing and this is not Debian; install: $(2)"; exit 1; \
	fi; \
	for p in $(2); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make: installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >build/apt.log 2>&1 \
	      || { echo "make: apt-get failed, see build/apt.log"; tail -5 build/apt.log; exit 1; }; \
	  else \
	    echo "make: missing packages; run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi
endef

deps: build-deps test-deps
build-deps: $(BUILD_DEPS_STAMP)
test-deps: $(TEST_DEPS_STAMP)

# Found through pkg-config, Debian or not; apt-get only when they are not.
$(BUILD_DEPS_STAMP):
	@if ! pkg-config --exists $(PKGS) 2>/dev/null; then \
	  $(MAKE) --no-print-directory apt-build-deps || exit 1; \
	  pkg-config --exists $(PKGS) || { echo "make: pkg-config cannot find: $(PKGS)"; exit 1; }; \
	fi
	@mkdir -p build && touch $@

.PHONY: apt-build-deps
apt-build-deps:
	$(call apt_install,the build libraries ($(PKGS)),$(DEB_BUILD_PKGS))

$(TEST_DEPS_STAMP): | $(BUILD_DEPS_STAMP)
	$(call apt_install,the test toolchain,$(DEB_TEST_PKGS))
	@touch $@

# ---------------------------------------------------------------- build
$(BUILD)/obj/%.o: %.c | $(BUILD_DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

$(BUILD)/obj/%.o: %.cc | $(BUILD_DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS_ALL) -c $< -o $@

# Compute kernels: -O3 lets gcc vectorise loops whose trip count is not known.
$(BUILD)/obj/stages/%.o: stages/%.c | $(BUILD_DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -O3 -c $< -o $@

$(BUILD)/obj/base/dtype.o: base/dtype.c | $(BUILD_DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -O3 -c $< -o $@

$(BUILD)/obj/tests/%.o: tests/%.c | $(TEST_DEPS_STAMP)
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

# One run of the generator writes all three (a grouped target would need make 4.3).
$(BUILD)/mergestream.1: $(CLI) docs/mergestream.1.in tools/gen-docs.sh
	sh tools/gen-docs.sh $(BUILD)
$(BUILD)/completions/mergestream.bash $(BUILD)/completions/_mergestream: $(BUILD)/mergestream.1

# ---------------------------------------------------------------- install
install: $(CLI) $(DOCS)
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(BASHCOMPDIR) \
	  $(DESTDIR)$(ZSHCOMPDIR)
	$(INSTALL) -m 755 $(CLI) $(DESTDIR)$(BINDIR)/mergestream
	$(INSTALL) -m 644 $(BUILD)/mergestream.1 $(DESTDIR)$(MANDIR)/man1/mergestream.1
	$(INSTALL) -m 644 $(BUILD)/completions/mergestream.bash $(DESTDIR)$(BASHCOMPDIR)/mergestream
	$(INSTALL) -m 644 $(BUILD)/completions/_mergestream $(DESTDIR)$(ZSHCOMPDIR)/_mergestream

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/mergestream $(DESTDIR)$(MANDIR)/man1/mergestream.1 \
	  $(DESTDIR)$(BASHCOMPDIR)/mergestream $(DESTDIR)$(ZSHCOMPDIR)/_mergestream

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

# Builds the .deb from a copy of the tree (this tree and its build/ stay untouched),
# installs it with dpkg -i, runs the installed mergestream, then removes the package.
check-deb: | $(TEST_DEPS_STAMP)
	@sh tools/check-deb.sh

fuzz: | $(TEST_DEPS_STAMP)
	@sh tests/fuzz/run.sh $(FUZZ_SECONDS)

bench: all
	@sh tools/bench.sh $(BUILD)

# Formats only the lines changed since the last commit (.clang-format says why).
fmt:
	git clang-format --style=file --extensions c,h,cc

clean:
	rm -rf build

-include $(wildcard $(BUILD)/obj/*/*.d $(BUILD)/obj/tests/*.d)
