/* Decode only a region of a JPEG: libjpeg-turbo's partial decompression (jpeg_crop_scanline for
 * the columns, jpeg_skip_scanlines for the rows above), for the workers of augsvc's encoded and
 * files layouts, which know each sample's random crop before they decode it.
 *
 * decode_region(data, out, height, width, depth, scale, x0, y0, x1, y1) -> bool
 *
 * `out` is a writable C-contiguous buffer of the whole decoded image (height x width x depth bytes,
 * depth 4 = RGBX, 3 = RGB, 1 = gray), the JPEG decoded at 1/scale. Only the pixels of the rectangle
 * [x0, x1) x [y0, y1) are written, and they are the bytes a full decode gives (see MARGIN);
 * others are left as they were or written with pixels that may differ from a full decode, so the
 * caller reads only the rectangle. Returns False, having written nothing, when the file is
 * not one this path takes (progressive or other multi-scan, arithmetic-coded, CMYK/YCCK, another
 * size than height x width, data that does not end with an EOI marker, as a truncated file's does
 * not, a header this libjpeg-turbo does not read, such as a lossless JPEG's): the caller then
 * decodes it whole, and a truncated file fails whatever its crop. Raises ValueError for scan data
 * libjpeg-turbo refuses, warnings included (what a strict full decode refuses). Rows below the
 * rectangle are not decoded at all, so damage confined to them goes unnoticed by this call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

/* Columns decoded beyond the rectangle on each side. Fancy upsampling of horizontally subsampled
 * chroma reads the neighbouring chroma sample, which a crop's edge replaces by its own: the
 * outermost columns of a cropped decode differ from a full decode (seen on 4:2:0 and 4:2:2 files
 * with no margin), one chroma sample (2 pixels at 4:2:x, 4 at 4:1:1) inside them do not. Rows need
 * none: jpeg_skip_scanlines keeps the upsampler's context rows, and the rows it skips to are the
 * same as a full decode's (tests/test_jpeg_region.py checks both on every subsampling, at every
 * DCT scale). The crop moves left to an iMCU boundary anyway, so the margin costs little. */
#ifndef MARGIN_X
#define MARGIN_X 8
#endif
#ifndef MARGIN_Y
#define MARGIN_Y 0
#endif

struct strict_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int header_read; /* set once jpeg_read_header has returned */
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct strict_error *err = (struct strict_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) { /* a warning (corrupt data): an error here, as in a strict full decode */
        on_error(cinfo);
    }
}

/* 1 decoded, 0 not taken, -1 error (message in err->message) */
static int decode(struct jpeg_decompress_struct *cinfo, struct strict_error *err, const unsigned char *data,
                  size_t size, unsigned char *out, int height, int width, int depth, int scale, int x0, int y0,
                  int x1, int y1) {
    JSAMPROW rows[16];
    int lo_y, hi_y, y, n, k;
    JDIMENSION xoff, cols;

    if (size < 4 || data[size - 2] != 0xFF || data[size - 1] != 0xD9) {
        return 0;
    }
    if (setjmp(err->jump)) {
        /* Before the header is read: a file this library cannot take (lossless or 12-bit, which
         * the full decoder's newer libjpeg-turbo may read, or a damaged header) is left to the
         * full decode, which reads it or refuses it. After: corrupt data in the region. */
        return err->header_read ? -1 : 0;
    }
    jpeg_create_decompress(cinfo); /* after setjmp: its errors (no memory, a mismatched library) jump too */
    jpeg_mem_src(cinfo, data, (unsigned long)size);
    jpeg_read_header(cinfo, TRUE);
    err->header_read = 1;
    /* Only single-scan Huffman-coded files, the kind the self-check in decode.py compares against
     * the full decoder: progressive and other multi-scan files (every scan must be read anyway) and
     * arithmetic-coded ones decode whole. */
    if (cinfo->progressive_mode || jpeg_has_multiple_scans(cinfo) || cinfo->arith_code
        || (cinfo->jpeg_color_space != JCS_YCbCr && cinfo->jpeg_color_space != JCS_GRAYSCALE
            && cinfo->jpeg_color_space != JCS_RGB)) {
        return 0;
    }
    cinfo->out_color_space = depth == 4 ? JCS_EXT_RGBX : depth == 3 ? JCS_RGB : JCS_GRAYSCALE;
    cinfo->scale_num = 1;
    cinfo->scale_denom = (unsigned int)scale;
    cinfo->dct_method = JDCT_ISLOW;
    cinfo->do_fancy_upsampling = TRUE;
    jpeg_calc_output_dimensions(cinfo);
    if ((int)cinfo->output_height != height || (int)cinfo->output_width != width
        || cinfo->output_components != depth) {
        return 0;
    }
    jpeg_start_decompress(cinfo);
    lo_y = y0 > MARGIN_Y ? y0 - MARGIN_Y : 0;
    hi_y = y1 + MARGIN_Y < height ? y1 + MARGIN_Y : height;
    xoff = (JDIMENSION)(x0 > MARGIN_X ? x0 - MARGIN_X : 0);
    cols = (JDIMENSION)((x1 + MARGIN_X < width ? x1 + MARGIN_X : width) - (int)xoff);
    if (xoff > 0 || (int)cols < width) {
        jpeg_crop_scanline(cinfo, &xoff, &cols); /* xoff moves left to an iMCU boundary, the right edge stays */
    }
    if (lo_y > 0) {
        jpeg_skip_scanlines(cinfo, (JDIMENSION)lo_y);
    }
    for (y = lo_y; y < hi_y; y += n) {
        n = hi_y - y < 16 ? hi_y - y : 16;
        for (k = 0; k < n; k++) {
            rows[k] = out + ((size_t)(y + k) * (size_t)width + xoff) * (size_t)depth;
        }
        n = (int)jpeg_read_scanlines(cinfo, rows, (JDIMENSION)n);
        if (n <= 0) {
            strcpy(err->message, "no scanlines decoded");
            return -1;
        }
    }
    jpeg_abort_decompress(cinfo); /* the rows below are not needed */
    return 1;
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    int height, width, depth, scale, x0, y0, x1, y1, result;
    struct jpeg_decompress_struct cinfo;
    struct strict_error err;

    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*iiiiiiii", &data, &out, &height, &width, &depth, &scale, &x0, &y0, &x1,
                          &y1)) {
        return NULL;
    }
    if ((depth != 1 && depth != 3 && depth != 4) || (scale != 1 && scale != 2 && scale != 4 && scale != 8) || height < 1
        || width < 1 || !(0 <= x0 && x0 < x1 && x1 <= width) || !(0 <= y0 && y0 < y1 && y1 <= height)
        || out.len < (Py_ssize_t)height * width * depth || !PyBuffer_IsContiguous(&out, 'C')) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_IndexError, "decode_region: bad arguments"); /* never a corrupt-image ValueError */
        return NULL;
    }
    memset(&err, 0, sizeof(err));
    memset(&cinfo, 0, sizeof(cinfo)); /* so that jpeg_destroy_decompress is safe whenever decode() stops */
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    Py_BEGIN_ALLOW_THREADS
    result = decode(&cinfo, &err, (const unsigned char *)data.buf, (size_t)data.len, (unsigned char *)out.buf,
                    height, width, depth, scale, x0, y0, x1, y1);
    jpeg_destroy_decompress(&cinfo);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (result < 0) {
        PyErr_SetString(PyExc_ValueError, err.message);
        return NULL;
    }
    return PyBool_FromLong(result);
}

static PyObject *library_version(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#ifdef LIBJPEG_TURBO_VERSION
#define STR2(x) #x
#define STR(x) STR2(x)
    return PyUnicode_FromString("libjpeg-turbo " STR(LIBJPEG_TURBO_VERSION));
#else
    return PyUnicode_FromFormat("libjpeg API %d", JPEG_LIB_VERSION);
#endif
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, out, height, width, depth, scale, x0, y0, x1, y1) -> bool"},
    {"library_version", library_version, METH_NOARGS, "The libjpeg-turbo this module was built against."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpegregion", "Partial JPEG decoding with libjpeg-turbo.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jpegregion(void) { return PyModule_Create(&module); }
