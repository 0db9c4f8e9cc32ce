// Reading `module.parameters()` without running the generator (csrc/module_walk.cpp).
#pragma once

#include <Python.h>

#include <vector>

namespace gradclip {

// When `obj` is an unstarted generator made by torch.nn.Module.parameters(recurse) and every
// module it would visit iterates the way torch.nn.Module does (see module_walk.cpp for the exact
// conditions), fills `out` with the items list(obj) would give, in the same order (borrowed
// references, valid while the modules are not changed), and returns true. Otherwise returns false
// and leaves `obj` untouched. Never leaves a Python error set; runs no Python code.
bool walk_module_parameters(PyObject* obj, std::vector<PyObject*>& out);

// Marks a generator walked by walk_module_parameters as exhausted, as list(obj) would have left
// it (an unstarted generator closes without running any of its code).
void finish_walked_generator(PyObject* obj);

}  // namespace gradclip
