# CMake generated Testfile for 
# Source directory: /work/main
# Build directory: /work/main/build-cmake
# 
# This file includes the relevant testing commands required for 
# testing this directory and lists subdirectories to be tested as well.
add_test([=[archext_cpp_tests]=] "/work/main/build-cmake/archext_cpp_tests")
set_tests_properties([=[archext_cpp_tests]=] PROPERTIES  TIMEOUT "900" _BACKTRACE_TRIPLES "/work/main/CMakeLists.txt;180;add_test;/work/main/CMakeLists.txt;0;")
