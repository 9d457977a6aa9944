# Helpers shared by every folder.
#
#   mat_library(NAME SOURCES ... DEPS ... [TORCH])   one library per folder
#   mat_test(NAME SOURCES ... DEPS ... [TORCH] [LABELS ...])   a GoogleTest binary registered with ctest
#
# TORCH targets reuse one precompiled header (torch/torch.h) so each LibTorch-heavy TU compiles fast.

set(MAT_WARNINGS -Wall -Wextra -Wno-unused-parameter)

function(_mat_torch_pch target)
  if(NOT TARGET mat_torch_pch)
    add_library(mat_torch_pch STATIC ${CMAKE_SOURCE_DIR}/cmake/torch_pch.cc)
    target_link_libraries(mat_torch_pch PUBLIC ${TORCH_LIBRARIES})
    # -pthread everywhere the header is reused: GCC drops a PCH built without _REENTRANT for a
    # translation unit that defines it (every target that links gRPC or abseil threads does).
    target_compile_options(mat_torch_pch PRIVATE -Wno-unused-parameter -pthread)
    target_precompile_headers(mat_torch_pch PRIVATE <torch/torch.h>)
  endif()
  target_compile_options(${target} PRIVATE -pthread)
  target_precompile_headers(${target} REUSE_FROM mat_torch_pch)
endfunction()

function(mat_library name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${CMAKE_SOURCE_DIR} ${CMAKE_BINARY_DIR})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
  target_compile_options(${name} PRIVATE ${MAT_WARNINGS})
  if(ARG_TORCH)
    target_link_libraries(${name} PUBLIC ${TORCH_LIBRARIES})
    _mat_torch_pch(${name})
  endif()
endfunction()

function(mat_test name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  if(NOT TARGET mat_gtest_main)
    add_library(mat_gtest_main STATIC ${CMAKE_SOURCE_DIR}/tests/testing/gtest_main.cc)
    target_link_libraries(mat_gtest_main PUBLIC GTest::gtest)
  endif()
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gtest mat_gtest_main)
  target_compile_definitions(${name} PRIVATE
    MAT_SOURCE_DIR="${CMAKE_SOURCE_DIR}" MAT_SHARED_DIR="${MAT_SHARED_DIR}"
    MAT_BIN_DIR="${CMAKE_BINARY_DIR}/bin")
  target_compile_options(${name} PRIVATE ${MAT_WARNINGS})
  if(ARG_TORCH)
    target_link_libraries(${name} PRIVATE ${TORCH_LIBRARIES})
    _mat_torch_pch(${name})
  endif()
  add_test(NAME ${name} COMMAND ${name})
  set(labels unit)
  if(ARG_LABELS)
    set(labels ${ARG_LABELS})
  endif()
  # tests/testing/gtest_main.cc exits 77 when every test of the binary was skipped (GTEST_SKIP):
  # ctest then counts it as skipped, not passed.
  set_tests_properties(${name} PROPERTIES LABELS "${labels}" TIMEOUT 900 SKIP_RETURN_CODE 77)
endfunction()
