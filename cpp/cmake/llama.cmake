# Build the pinned, patched llama.cpp once per backend into a cache outside the source tree, and
# import it as the static targets `llama` and `ggml::*`.
#
# Why outside the project's build dir: compiling llama.cpp takes ~12 minutes on 2 cores, and a fresh
# clone (CI, a second checkout) must not pay it again. The build tree lives at
#   <cache>/llama.cpp/build-<backend>-<hash of source dir + options>
# so any checkout of this project reuses it; Ninja rebuilds only files a patch changed.
#
# Inputs (CMake variables, or environment variables of the same name):
#   NAKSHATRA_BACKEND          cpu (default) | cuda | rocm | metal | vulkan
#   NAKSHATRA_LLAMA_CPP_DIR    a llama.cpp checkout to use instead of the pinned sdist
#   NAKSHATRA_CACHE_DIR        default: $XDG_CACHE_HOME/nakshatra or ~/.cache/nakshatra
#   NAKSHATRA_LLAMA_CMAKE_ARGS extra ';'-separated arguments for llama.cpp's configure

foreach(var NAKSHATRA_BACKEND NAKSHATRA_LLAMA_CPP_DIR NAKSHATRA_CACHE_DIR NAKSHATRA_LLAMA_CMAKE_ARGS)
    if(NOT DEFINED ${var} AND DEFINED ENV{${var}})
        set(${var} "$ENV{${var}}")
    endif()
endforeach()
if(NOT NAKSHATRA_BACKEND)
    set(NAKSHATRA_BACKEND cpu)
endif()
if(NOT NAKSHATRA_CACHE_DIR)
    if(DEFINED ENV{XDG_CACHE_HOME})
        set(NAKSHATRA_CACHE_DIR "$ENV{XDG_CACHE_HOME}/nakshatra")
    else()
        set(NAKSHATRA_CACHE_DIR "$ENV{HOME}/.cache/nakshatra")
    endif()
endif()

# ggml option per backend; the toolkit check lives in llama.cpp's own CMake (and in `nak build`).
set(_nak_backend_args_cpu "")
set(_nak_backend_args_cuda "-DGGML_CUDA=ON")
set(_nak_backend_args_rocm "-DGGML_HIP=ON")
set(_nak_backend_args_metal "-DGGML_METAL=ON")
set(_nak_backend_args_vulkan "-DGGML_VULKAN=ON")
if(NOT DEFINED _nak_backend_args_${NAKSHATRA_BACKEND})
    message(FATAL_ERROR "NAKSHATRA_BACKEND=${NAKSHATRA_BACKEND} is unknown; use one of cpu, cuda, rocm, metal, vulkan")
endif()

execute_process(
    COMMAND ${Python_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/fetch_llama.py
            --project ${PROJECT_SOURCE_DIR} --cache ${NAKSHATRA_CACHE_DIR}
            --source "${NAKSHATRA_LLAMA_CPP_DIR}"
    OUTPUT_VARIABLE _nak_prep OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _nak_rc)
if(NOT _nak_rc EQUAL 0)
    message(FATAL_ERROR "nakshatra: preparing the llama.cpp source failed (see the message above)")
endif()
string(REGEX REPLACE ".*\n" "" _nak_prep "${_nak_prep}")
list(GET _nak_prep 0 NAKSHATRA_LLAMA_SRC)
list(GET _nak_prep 1 NAKSHATRA_LLAMA_COMMIT)
list(GET _nak_prep 2 NAKSHATRA_PATCH_HASH)

set(_nak_args
    -G Ninja
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_OPENSSL=OFF
    -DGGML_BACKEND_DL=OFF
    # ggml's own thread pool instead of OpenMP: with OpenMP every graph node ends in an
    # `omp barrier` that either spins for ever (ACTIVE: stages on one machine starve each other)
    # or sleeps each time (PASSIVE: 2.5x slower decode); ggml's barriers spin only inside a
    # graph, and a pool with poll = 0 sleeps as soon as a decode ends (see cpp/stage/stage.cpp)
    -DGGML_OPENMP=OFF
    # ggml's RPC backend, so `nak bench --rpc-baseline` can build upstream's rpc-server and
    # llama-bench in this same tree (python/nakshatra/bench/rpc_baseline.py); unused by our extension
    -DGGML_RPC=ON
    ${_nak_backend_args_${NAKSHATRA_BACKEND}}
    ${NAKSHATRA_LLAMA_CMAKE_ARGS})
string(SHA256 _nak_key "${NAKSHATRA_LLAMA_SRC};${_nak_args}")
string(SUBSTRING "${_nak_key}" 0 12 _nak_key)
set(NAKSHATRA_LLAMA_BUILD "${NAKSHATRA_CACHE_DIR}/llama.cpp/build-${NAKSHATRA_BACKEND}-${_nak_key}")
set(NAKSHATRA_LLAMA_PREFIX "${NAKSHATRA_LLAMA_BUILD}/install")

# Two builds at once (two pip installs) must not share a half-written tree.
file(MAKE_DIRECTORY ${NAKSHATRA_LLAMA_BUILD})
file(LOCK ${NAKSHATRA_LLAMA_BUILD}/.lock TIMEOUT 3600)

macro(_nak_build_llama)
    # Configure every time (a few seconds, no recompilation when nothing changed): the build files
    # then name the cmake of this build environment, not a deleted one from an earlier isolated build.
    # The CMake projects llama.cpp builds inside its tree (ggml-vulkan's vulkan-shaders-gen, an
    # ExternalProject) keep their own cache, which llama.cpp's configure does not give this build's
    # ninja: point it there too, or a second isolated `nak build --backend vulkan` fails to find the
    # ninja of the first.
    file(GLOB _nak_sub_caches "${NAKSHATRA_LLAMA_BUILD}/ggml/src/*/*-prefix/src/*-build/CMakeCache.txt")
    foreach(_nak_cache IN LISTS _nak_sub_caches)
        file(READ "${_nak_cache}" _nak_text)
        string(REGEX REPLACE "CMAKE_MAKE_PROGRAM:FILEPATH=[^\n]*" "CMAKE_MAKE_PROGRAM:FILEPATH=${CMAKE_MAKE_PROGRAM}"
               _nak_new "${_nak_text}")
        if(NOT _nak_new STREQUAL _nak_text)
            file(WRITE "${_nak_cache}" "${_nak_new}")
        endif()
    endforeach()
    message(STATUS "nakshatra: configuring llama.cpp (${NAKSHATRA_BACKEND}) in ${NAKSHATRA_LLAMA_BUILD}")
    execute_process(
        COMMAND ${CMAKE_COMMAND} -S ${NAKSHATRA_LLAMA_SRC} -B ${NAKSHATRA_LLAMA_BUILD}
                -DCMAKE_INSTALL_PREFIX=${NAKSHATRA_LLAMA_PREFIX}
                # this build's ninja: the cache may name one from a deleted environment
                -DCMAKE_MAKE_PROGRAM=${CMAKE_MAKE_PROGRAM}
                ${_nak_args}
        OUTPUT_VARIABLE _nak_out ERROR_VARIABLE _nak_out
        RESULT_VARIABLE _nak_rc)
    if(NOT _nak_rc EQUAL 0)
        file(LOCK ${NAKSHATRA_LLAMA_BUILD}/.lock RELEASE)
        message(FATAL_ERROR "${_nak_out}\nnakshatra: configuring llama.cpp for '${NAKSHATRA_BACKEND}' failed; "
                            "see the CMake output above (a missing toolkit is named there)")
    endif()
    message(STATUS "nakshatra: building llama.cpp (first time a few minutes; later only what changed)")
    execute_process(COMMAND ${CMAKE_COMMAND} --build ${NAKSHATRA_LLAMA_BUILD} --target install
                    RESULT_VARIABLE _nak_rc)
    if(NOT _nak_rc EQUAL 0)
        file(LOCK ${NAKSHATRA_LLAMA_BUILD}/.lock RELEASE)
        message(FATAL_ERROR "nakshatra: building llama.cpp failed; see the compiler output above")
    endif()
endmacro()

# The compiled llama.cpp is a function of the prepared source (the pinned tree and the patch set)
# and the options: when the last successful build in this tree was of the same, skip configure
# and build. Ninja would find nothing to do for most backends, but ggml-vulkan's shader generator
# is an ExternalProject built on every build, after which every shader is generated and compiled
# again (200 s of a Vulkan rebuild on 2 cores). A llama.cpp checkout of the user's own
# (NAKSHATRA_LLAMA_CPP_DIR) may change under us: it is always built.
set(_nak_stamp "${NAKSHATRA_LLAMA_BUILD}/.nakshatra-built")
string(SHA256 _nak_built_key "${NAKSHATRA_LLAMA_SRC};${NAKSHATRA_LLAMA_COMMIT};${NAKSHATRA_PATCH_HASH};${_nak_args}")
set(_nak_built_before "")
if(EXISTS "${_nak_stamp}" AND EXISTS "${NAKSHATRA_LLAMA_PREFIX}/lib/cmake/llama/llama-config.cmake"
   AND NOT NAKSHATRA_LLAMA_CPP_DIR)
    file(READ "${_nak_stamp}" _nak_built_before)
endif()
if(_nak_built_before STREQUAL _nak_built_key)
    message(STATUS "nakshatra: llama.cpp (${NAKSHATRA_BACKEND}) already built for this source and these "
                   "options in ${NAKSHATRA_LLAMA_BUILD}")
else()
    file(REMOVE "${_nak_stamp}")
    _nak_build_llama()
    file(WRITE "${_nak_stamp}" "${_nak_built_key}")
endif()
file(LOCK ${NAKSHATRA_LLAMA_BUILD}/.lock RELEASE)

# CUDA: the static ggml-cuda's exported config (ggml-config.cmake) names the CUDA runtime and cuBLAS
# only for GGML_STATIC builds, so the extension links them itself (CMakeLists.txt), from the same
# files llama.cpp's configure was given: `nak build` passes a cuBLAS from the nvidia-cublas wheel
# or a driver library outside the toolkit as CUDA_<lib>_LIBRARY arguments, which FindCUDAToolkit
# then takes as found.
if(NAKSHATRA_BACKEND STREQUAL "cuda")
    foreach(_nak_arg IN LISTS NAKSHATRA_LLAMA_CMAKE_ARGS)
        if(_nak_arg MATCHES "^-D(CUDA_[A-Za-z_]+_LIBRARY|CUDAToolkit_ROOT)=(.+)$")
            set(${CMAKE_MATCH_1} "${CMAKE_MATCH_2}" CACHE FILEPATH "from NAKSHATRA_LLAMA_CMAKE_ARGS" FORCE)
        endif()
    endforeach()
endif()
find_package(llama CONFIG REQUIRED PATHS ${NAKSHATRA_LLAMA_PREFIX} NO_DEFAULT_PATH)
# Internal headers (src/) are not used: our C++ speaks only llama.h plus the metadata our patches read.
